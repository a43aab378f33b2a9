"""The ComfyUI provider, driven exactly as ComfyUI's caching layer drives it (tests/support/comfy_harness.py).

Two ComfyUI-like processes share a real mesh on 127.0.0.1; in-process engines check the provider's contract
(misses, dead meshes, full queues, corrupt blobs, policy, configuration) against real nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mesh import codec
from mesh.client import LocalClient, RemoteClient
from mesh.transport.peer import PeerClient
from provider.bridge import Bridge
from provider.cache_provider import MeshCacheProvider
from provider.config import ProviderConfig
from provider.policy import Policy, value_tree
from provider.runtime import namespace_for
from tests.support.comfy_harness import (API, STANDARD_LOCAL, STANDARD_SHARED, CacheValue, Engine, HarnessProcess,
                                         b_is_served_what_a_computed, chain_prompt, parser, standard_prompt,
                                         start_runtime, traits_lookup)
from tests.conftest import Collect, free_port, poll
from tests.support.cli import run_cli

SECRET = "provider-test-secret"


def harness(tmp_path: Path, name: str, *args: str) -> HarnessProcess:
    return HarnessProcess(["--secret", SECRET, "--node-id", name, *args], log_path=tmp_path / f"{name}.log")


def runtime(*args: str) -> Any:
    return start_runtime(parser().parse_args(["--secret", SECRET, *args]))


@pytest.fixture
def lone() -> Iterator[Any]:
    """A provider with an embedded node that is alone in its mesh."""
    rt = runtime("--lookup-timeout", "2")
    try:
        yield rt
    finally:
        rt.close()


def shared_outputs(result: dict[str, Any]) -> dict[str, Any]:
    return {nid: result["outputs"][nid] for nid in STANDARD_SHARED}


# -- two ComfyUI-like processes -------------------------------------------------------------------------------


def test_b_gets_what_a_computed_bit_exactly(tmp_path: Path) -> None:
    a = harness(tmp_path, "a")
    b = None
    try:
        b = harness(tmp_path, "b", "--seeds", a.address)
        a.wait_members(2)
        b.wait_members(2)
        ra = a.run(workflow="standard", seed=11)
        assert ra["errors"] == [] and ra["failed"] == []
        assert set(ra["executed"]) == set(STANDARD_SHARED) | set(STANDARD_LOCAL)
        assert ra["stores_cancelled"] == 0  # each store was handed off before the first await
        assert a.flush(30)
        stats = a.stats()["provider"]
        # every cacheable class was handed off; the one value the codec cannot represent was refused on the
        # store thread, after the prompt
        assert stats["provider_bridge_stores"] == len(STANDARD_SHARED)
        assert stats["provider_stores"] == len(STANDARD_SHARED) + stats["provider_bridge_stores_refused"]

        rb = b.run(workflow="standard", seed=11)
        assert rb["errors"] == [] and rb["failed"] == []
        # IMAGE, LATENT dict, CONDITIONING, bf16, fp8, str/int/float/bool, and an IMAGE computed from a MODEL.
        assert set(rb["provider_hits"]) == set(STANDARD_SHARED)
        assert set(rb["executed"]) == set(STANDARD_LOCAL)
        assert shared_outputs(rb) == shared_outputs(ra)  # dtype, shape, sha256 of every tensor; exact scalars
        assert rb["nodes"]["blur"]["exec_s"] == 0.0  # the slow node did not run on B
        # Never asked: the output node, the non-idempotent node, the node whose IS_CHANGED is NaN.
        for nid in ("save", "noise", "changed"):
            assert rb["nodes"][nid]["lookups"] == 0, nid
        # The MODEL-like value was never stored: B looked it up, missed, and loaded it itself.
        assert rb["nodes"]["model"]["status"] == "executed"

        stats = b.stats()["provider"]
        assert stats["provider_hits"] == len(STANDARD_SHARED)
        assert stats["provider_errors"] == 0
        assert stats["provider_bytes"] == stats["provider_bridge_bytes_in"] > 0
        # provider_* counters are part of the node's Stats (what `mesh stats` prints).
        with PeerClient(b.address, SECRET.encode()) as client:
            counters = dict(client.stats(timeout=5).counters)
        assert counters["provider_hits"] == len(STANDARD_SHARED)
        assert counters["provider_prompts"] == 1
        # A different seed is a different key: nothing is shared.
        rc = b.run(workflow="standard", seed=12)
        assert rc["provider_hits"] == [] and rc["errors"] == []
    finally:
        if b is not None:
            b.quit()
        a.quit()


def test_sidecar_mode_shares_through_mesh_serve(tmp_path: Path) -> None:
    from tests.support.localmesh import LocalMesh

    with LocalMesh(secret=SECRET.encode()) as mesh:
        mesh.start(2)
        mesh.wait_members(2)
        a = harness(tmp_path, "a", "--mode", "sidecar", "--node", mesh.nodes[0].address)
        b = None
        try:
            b = harness(tmp_path, "b", "--mode", "sidecar", "--node", mesh.nodes[1].address)
            assert a.address is None  # no node in the ComfyUI process
            b_is_served_what_a_computed(a, b, seed=21)
            # B's provider reports its counters to its sidecar: `mesh stats` there shows them.
            counters: dict[str, float] = {}

            def reported() -> bool:
                nonlocal counters
                done = run_cli("stats", "--json", node=mesh.nodes[1].address, secret_file=mesh.secret_file)
                assert done.returncode == 0, done.stderr
                counters = json.loads(done.stdout)["counters"]
                return counters.get("provider_hits") == len(STANDARD_SHARED)

            poll(reported, "B's provider hits reported to its sidecar", timeout=20, interval=0.5)
            assert counters.get("provider_prompts") == 1
        finally:
            if b is not None:
                b.quit()
            a.quit()


def test_owner_killed_means_misses_not_errors(tmp_path: Path) -> None:
    """A holds the only copy (replicas=1) and dies: B recomputes, within deadlines, and ComfyUI sees nothing."""
    a = harness(tmp_path, "a", "--replicas", "1")
    try:
        rt = runtime("--seeds", a.address, "--replicas", "1", "--lookup-timeout", "1")
        try:
            a.wait_members(2)
            engine = Engine(rt.provider)
            a.run(workflow="standard", seed=31, args={"delay": 0.0})
            assert a.flush(30)
            a.kill()
            result = engine.run(standard_prompt(31, delay=0.0))
            assert result.errors == [] and result.failed == []
            assert len(result.executed) + len(result.provider_hits) == len(standard_prompt(31))
            assert result.gather_s < 1.0 + 2.0  # at most one lookup deadline, plus slack for a slow machine
        finally:
            rt.close()
    finally:
        a.kill()


# -- a dead or silent mesh ------------------------------------------------------------------------------------


def test_dead_sidecar_is_a_fast_miss() -> None:
    rt = runtime("--mode", "sidecar", "--node", f"127.0.0.1:{free_port()}", "--lookup-timeout", "1")
    try:
        engine = Engine(rt.provider)
        for seed in (41, 42):
            result = engine.run(standard_prompt(seed, delay=0.0))
            assert result.errors == [] and result.failed == [] and result.provider_hits == []
            assert len(result.executed) == len(standard_prompt(seed))
            assert result.gather_s < 1.0  # refused at once: not even one deadline
        assert rt.provider.stats()["provider_hits"] == 0
    finally:
        rt.close()


def test_silent_sidecar_costs_one_deadline_then_the_breaker_opens() -> None:
    """A peer that accepts connections and never answers: the first prompt pays one deadline, the next none."""
    with _silent_node("tcp") as address:
        rt = runtime("--mode", "sidecar", "--node", address, "--lookup-timeout", "0.5")
        try:
            engine = Engine(rt.provider)
            first = engine.run(standard_prompt(51, delay=0.0))
            assert first.errors == [] and first.provider_hits == []
            assert first.gather_s < 0.5 + 1.5
            # The second lookup of each node within the prompt was answered from the prompt's known misses.
            asked = [nid for nid, record in first.nodes.items() if record.lookups]
            assert len(asked) == len(STANDARD_SHARED) + 1  # and the MODEL, whose value is refused only at store time
            assert rt.bridge.counters.lookups == len(asked)
            second = engine.run(standard_prompt(52, delay=0.0))
            assert second.errors == [] and second.provider_hits == []
            assert second.gather_s < 0.5  # breaker open: no deadline paid
            assert rt.bridge.counters.breaker_trips >= 1
        finally:
            rt.close()


@contextlib.contextmanager
def _silent_node(kind: str) -> Iterator[str]:
    """The address of a node that takes every connection and never answers: `tcp`, a socket that accepts and
    reads nothing (no HTTP/2 handshake: a hung process); `grpc`, a real gRPC server whose handler of every
    method blocks (the handshake is done: a node whose handlers are stuck). Released when the test ends."""
    release = threading.Event()
    if kind == "grpc":
        import grpc
        from concurrent import futures as cf

        def block(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
            while context.is_active() and not release.wait(0.05):  # until the caller's deadline cancels it
                pass
            return iter(())

        class Stuck(grpc.GenericRpcHandler):
            def service(self, details: Any) -> Any:  # every method, whatever its kind: nothing ever comes back
                return grpc.stream_stream_rpc_method_handler(block)

        server = grpc.server(cf.ThreadPoolExecutor(max_workers=32), handlers=[Stuck()])
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            yield f"127.0.0.1:{port}"
        finally:
            release.set()
            server.stop(0)
        return
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while not release.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        release.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


@pytest.mark.parametrize("keys", [1, 3], ids=["get", "has"])
@pytest.mark.parametrize("kind", ["tcp", "grpc"])
def test_the_bridge_answers_within_mesh_lookup_timeout_from_a_node_that_never_answers(kind: str, keys: int) -> None:
    """Every lookup the bridge makes (a Get for one key, a batched Has for several) is a miss within
    MESH_LOOKUP_TIMEOUT, however the sidecar hangs: the provider's own timer only stops the prompt waiting,
    while a call without that deadline would hold the bridge's lookup thread (and every later prompt's
    lookups queued behind it). Configured as an operator does, through the environment."""
    from concurrent import futures as cf

    from provider import runtime as provider_runtime
    from tests.support.comfy_harness import COMFY_VERSION

    lookup_timeout, margin = 0.5, 1.0
    with _silent_node(kind) as address:
        config = ProviderConfig.load({"MESH_MODE": "sidecar", "MESH_NODE": address, "MESH_SECRET": SECRET,
                                      "MESH_LOOKUP_TIMEOUT": str(lookup_timeout), "MESH_IDENTITY": "0"})
        assert config.lookup_timeout == lookup_timeout
        rt = provider_runtime.start(config, cache_value=CacheValue, traits=traits_lookup(),
                                    comfy_version=COMFY_VERSION)
        try:
            batch: list[tuple[str, cf.Future[Any]]] = [(f"silent/{i}", cf.Future()) for i in range(keys)]
            started = time.monotonic()
            rt.bridge.submit(batch)
            done, waiting = cf.wait([f for _, f in batch], timeout=lookup_timeout + margin)
            seconds = time.monotonic() - started
            assert not waiting, f"{len(waiting)} of {keys} lookups unanswered after {seconds:.2f} s"
            assert [f.result() for _, f in batch] == [None] * keys  # misses, never errors
            assert lookup_timeout * 0.9 <= seconds < lookup_timeout + margin  # the deadline's miss: nobody said no
            assert rt.bridge.counters.hits == 0 and rt.bridge.counters.misses + rt.bridge.counters.errors == keys
        finally:
            rt.close()


# -- the provider's contract, in process ------------------------------------------------------------------------


def test_a_drained_embedded_node_turns_the_provider_off_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Once every prompt logged a traceback (`cannot schedule new futures after shutdown`), every store another."""
    rt = runtime("--lookup-timeout", "1")
    try:
        engine = Engine(rt.provider)
        assert engine.run(standard_prompt(61, delay=0.0)).errors == []
        rt.bridge.flush(10)
        rt.node.drain()
        rt.node.stop()
        with caplog.at_level(logging.WARNING):
            for seed in (62, 63, 64):
                result = engine.run(standard_prompt(seed, delay=0.0))
                assert result.errors == [] and result.failed == [] and result.provider_hits == []
            rt.bridge.flush(10)
        off = [r for r in caplog.records if "comfy-mesh is off" in r.getMessage()]
        assert len(off) == 1, [r.getMessage() for r in caplog.records]
        assert not any(r.exc_info for r in caplog.records)
    finally:
        rt.close()


def test_one_batched_round_trip_per_prompt_for_misses(lone: Any) -> None:
    engine = Engine(lone.provider)
    prompt = chain_prompt(40, seed=7, width=4)
    result = engine.run(prompt)
    assert result.errors == [] and len(result.executed) == 40
    assert result.provider_lookups == 80  # ComfyUI asks twice per node...
    assert lone.bridge.counters.lookups == 40  # ...the mesh is asked once per node...
    assert lone.bridge.counters.batches == 1  # ...in one batch for the whole prompt-start gather
    assert lone.bridge.flush(10)
    # The next prompt with the same inputs: everything from the mesh (a fresh engine has no local cache).
    again = Engine(lone.provider).run(prompt)
    assert len(again.provider_hits) == 40 and again.executed == []


def test_stores_land_even_when_comfyui_cancels_store_tasks(lone: Any) -> None:
    result = Engine(lone.provider, store_tasks="deferred").run(standard_prompt(61, delay=0.0))
    # one store per cacheable class: the shared values plus one the codec refuses later, on the store thread
    assert result.stores_created == len(STANDARD_SHARED) + 1 and result.stores_cancelled == 0
    immediate = Engine(lone.provider, store_tasks="immediate").run(standard_prompt(62, delay=0.0))
    assert immediate.stores_created == len(STANDARD_SHARED) + 1
    assert lone.bridge.flush(10)
    assert lone.bridge.counters.stores == 2 * len(STANDARD_SHARED) and lone.bridge.counters.stores_refused == 2
    assert len(lone.node.store) == 2 * len(STANDARD_SHARED)


def test_prompt_line_is_logged_at_prompt_end(lone: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="comfy_mesh"):
        Engine(lone.provider).run(chain_prompt(5, seed=3), prompt_id="p-123")
    lines = [r.getMessage() for r in caplog.records if "p-123" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("comfy-mesh prompt p-123: 10 lookups, 0 hits, 10 misses, 0 errors, ")
    assert lone.provider.stats()["provider_prompts"] == 1


def test_namespaces_do_not_share(tmp_path: Path) -> None:
    a = runtime("--namespace", "models-v1")
    b = runtime("--namespace", "models-v2", "--seeds", a.node.address)
    try:
        Engine(a.provider).run(chain_prompt(6, seed=5))
        assert a.bridge.flush(10)
        result = Engine(b.provider).run(chain_prompt(6, seed=5))
        assert result.provider_hits == [] and len(result.executed) == 6
        assert a.provider.namespace == namespace_for("0.21.0-test", "models-v1")
    finally:
        b.close()
        a.close()


class _Context:
    """A context whose digest came through ComfyUI's key function, as every real one does (so the provider's
    identity hook has seen it: a digest it never saw is not shared)."""

    def __init__(self, class_type: str, key: str = "k") -> None:
        digest = API._serialize_cache_key(frozenset({(0, frozenset({(0, class_type), (1, ("key", key))}))}))
        self.node_id, self.class_type, self.cache_key_hash = "1", class_type, digest


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_corrupt_or_foreign_blob_is_a_miss(lone: Any) -> None:
    provider: MeshCacheProvider = lone.provider
    client = LocalClient(lone.node)
    good = bytes(codec.encode({"outputs": [[torch.ones(1000)]], "ui": None}))
    cases = {"garbage": b"not a blob at all", "truncated": good[:-100], "bad manifest": good[:8] + b"X" + good[9:],
             "padded": good + b"\0" * 64, "not a ComfyUI value": bytes(codec.encode(torch.ones(3)))}
    for name, data in cases.items():
        client.put(provider.key(_Context("X", name)), data, {}, timeout=5)
    client.put(provider.key(_Context("X", "good")), good, {}, timeout=5)

    async def look() -> list[Any]:
        provider.on_prompt_start("corrupt")
        return [await provider.on_lookup(_Context("X", name)) for name in [*cases, "good"]]

    *bad, fine = _run(look())
    assert bad == [None] * len(cases)
    assert torch.equal(fine.outputs[0][0], torch.ones(1000))
    assert lone.bridge.counters.errors == len(cases) - 1  # refused by the codec
    assert provider.prompt.errors == 1  # decoded, but not a ComfyUI value
    assert provider.prompt.hits == 1


def test_full_store_queue_drops_and_counts(lone: Any) -> None:
    release = threading.Event()

    class Stalled(LocalClient):
        def put(self, *args: Any, **kwargs: Any) -> int:
            release.wait(10)
            return super().put(*args, **kwargs)

    bridge = Bridge(Stalled(lone.node), encode=lambda tree, meta: codec.encode(tree), decoder=codec.StreamDecoder,
                    lookup_timeout=1, store_timeout=5, store_queue=2)
    provider = MeshCacheProvider(bridge, Policy(traits_lookup()), namespace="ns", cache_value=CacheValue,
                                 lookup_timeout=1)
    try:
        async def store_many() -> float:
            t0 = time.perf_counter()
            for i in range(10):
                await provider.on_store(_Context("MakeImage", f"k{i}"), CacheValue(outputs=[[torch.ones(4) * i]]))
            return time.perf_counter() - t0

        _run(store_many())
        stats = provider.stats()
        assert stats["provider_stores"] + stats["provider_stores_dropped"] == 10
        assert stats["provider_stores_dropped"] >= 7  # one being pushed, two queued
        release.set()
        assert bridge.flush(10)
        assert bridge.counters.stores == stats["provider_stores"]
    finally:
        release.set()
        bridge.close()


def test_recently_stored_keys_are_skipped_and_the_memory_of_them_is_bounded(lone: Any, monkeypatch: Any) -> None:
    from provider import bridge as bridge_module
    monkeypatch.setattr(bridge_module, "RECENT_STORES", 50)
    puts: list[str] = []

    class Counting(LocalClient):
        def put(self, key: str, *args: Any, **kwargs: Any) -> int:
            puts.append(key)
            return super().put(key, *args, **kwargs)

    bridge = Bridge(Counting(lone.node), encode=lambda tree, meta: codec.encode(tree), decoder=codec.StreamDecoder,
                    lookup_timeout=1, store_timeout=5, store_queue=1000)
    try:
        for i in range(200):
            assert bridge.store(f"k{i}", [i], {})
        assert bridge.flush(10)
        assert len(puts) == 200 and len(bridge._recent_stores) == 50
        bridge.store("k199", [199], {})  # remembered: not sent again
        bridge.store("k0", [0], {})      # forgotten (bounded): sent again
        assert bridge.flush(10)
        assert puts[200:] == ["k0"]
    finally:
        bridge.close()


def test_get_into_feeds_the_value_from_either_client(lone: Any) -> None:
    data = bytes(range(256)) * 20_000 + b"tail"  # five chunks of 1 MiB, the last one short
    local = LocalClient(lone.node)
    assert local.put("into/k", data, {}, timeout=10) >= 1
    remote = RemoteClient(lone.node.address, SECRET.encode())
    try:
        for client in (local, remote):
            sink = Collect()
            assert client.get_into("into/k", 10, sink)
            assert sink.starts == 1 and len(sink.pieces) == 5 and b"".join(sink.pieces) == data
            assert not client.get_into("into/none", 10, Collect())
    finally:
        remote.close()


def test_values_the_codec_refuses_are_never_stored(lone: Any) -> None:
    provider, bridge = lone.provider, lone.bridge

    async def store() -> None:
        await provider.on_store(_Context("LoadModel", "model"), CacheValue(outputs=[[object()]]))
        await provider.on_store(_Context("MakeImage", "fine"), CacheValue(outputs=[[torch.ones(10)]]))

    _run(store())
    assert bridge.flush(10)
    assert bridge.counters.stores_refused == 1 and bridge.counters.stores == 1
    assert [e.header.key for e in lone.node.store.items()] == [provider.key(_Context("MakeImage", "fine"))]


class _SilentBridge:
    """A bridge whose lookups are taken and never answered: a stuck lookup thread."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def submit(self, batch: list[tuple[str, Any]]) -> None:
        self.batches.append([key for key, _ in batch])


def test_a_lookup_never_answered_is_a_miss_at_the_deadline() -> None:
    """Whatever happens behind the bridge, a batch of lookups costs the prompt one lookup_timeout at most."""
    bridge = _SilentBridge()
    provider = MeshCacheProvider(bridge, Policy(traits_lookup()), namespace="ns",  # type: ignore[arg-type]
                                 cache_value=CacheValue, lookup_timeout=0.3)

    async def prompt() -> list[Any]:
        provider.on_prompt_start("p")
        return list(await asyncio.gather(*(provider.on_lookup(_Context("MakeImage", str(i))) for i in range(5))))

    # Bounded here, in seconds: were the deadline lost, asyncio.run would never return, and only pytest's own
    # 300 s timeout would end the test (a hang that reads as a slow suite, not as this bug).
    found, seconds = _run_bounded(prompt, 0.3 + 2.0)
    assert found == [None] * 5 and len(bridge.batches) == 1 and len(bridge.batches[0]) == 5  # one batch
    assert 0.3 <= seconds < 0.3 + 2.0  # one deadline for the batch, not one per lookup
    assert provider.prompt.errors == 5 and provider.prompt.hits == 0

    async def again() -> Any:
        return await provider.on_lookup(_Context("MakeImage", "0"))

    # a key that timed out is not paid for again in the same prompt: answered at once, the bridge not asked
    answer, seconds = _run_bounded(again, 0.3)
    assert answer is None and len(bridge.batches) == 1


def _run_bounded(coroutine: Any, limit: float) -> tuple[Any, float]:
    """asyncio.run(coroutine()) on a thread of its own, failing the test once `limit` seconds passed without an
    answer (the thread is left to itself: a daemon); returns the answer and the seconds it took."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = asyncio.run(coroutine())
        except BaseException as e:  # handed to the test's thread
            outcome["error"] = e

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True, name="bounded-prompt")
    thread.start()
    thread.join(limit)
    seconds = time.monotonic() - started
    assert not thread.is_alive(), f"no answer within {limit} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"], seconds


def test_should_cache_policy() -> None:
    nodes = {"MakeImage", "SaveImage", "RandomNoise", "LoadModel", "Opaque", "BigTensor"}
    policy = Policy(traits_lookup(), deny=("BigTensor",), max_value_size=1 << 20)
    provider = MeshCacheProvider(None, policy, namespace="ns", cache_value=CacheValue, lookup_timeout=1)  # type: ignore[arg-type]
    assert {n for n in nodes if provider.should_cache(_Context(n))} == {"MakeImage", "LoadModel", "Opaque"}
    assert not provider.should_cache(_Context("NoSuchNode"))  # unknown class: do not guess
    # With a value, should_cache still answers from the class alone (a dictionary lookup on ComfyUI's loop);
    # the value itself is judged on the store thread (test_values_the_codec_refuses_are_never_stored).
    assert provider.should_cache(_Context("LoadModel"), CacheValue(outputs=[[object()]]))
    assert policy.allows_value("MakeImage", value_tree([[torch.ones(10)]], None))
    assert not policy.allows_value("MakeImage", value_tree([[torch.ones(1 << 19)]], None))  # 2 MiB
    assert not policy.allows_value("LoadModel", value_tree([[object()]], None))
    assert not policy.allows_value("Opaque", value_tree([[[1, len]]], None))
    only = Policy(traits_lookup(), allow=("MakeLatent",))
    assert only.allows_class("MakeLatent") and not only.allows_class("MakeImage")
    outputs = Policy(traits_lookup(), cache_output_nodes=True)
    assert outputs.allows_class("SaveImage") and not outputs.allows_class("RandomNoise")


# -- configuration --------------------------------------------------------------------------------------------


def test_the_shipped_default_does_not_cache_output_nodes(tmp_path: Path) -> None:
    """An operator who sets nothing must not get SaveImage served from the mesh (a hit skips the node: no file
    written on this instance). The harness always passes its own flag and test_should_cache_policy builds a
    Policy with Policy's default, so the default that ships (ProviderConfig's, read from an empty environment)
    is checked here, through the provider that runtime.start builds from it as comfy.install() does."""
    from provider import runtime as provider_runtime
    from tests.support.comfy_harness import COMFY_VERSION, fake_nodes_module

    assert ProviderConfig.load({}).cache_output_nodes is False
    # Only what keeps the test to itself: a free port, and file identities kept under tmp_path.
    config = ProviderConfig.load({"MESH_LISTEN": "127.0.0.1:0", "MESH_IDENTITY_CACHE": str(tmp_path / "ids.json")})
    assert config.cache_output_nodes is False
    rt = provider_runtime.start(config, cache_value=CacheValue, traits=traits_lookup(), comfy_version=COMFY_VERSION,
                                api=API, nodes=fake_nodes_module())
    try:
        assert not rt.provider.should_cache(_Context("SaveImage"))  # an OUTPUT_NODE of the fake ComfyUI
        assert rt.provider.should_cache(_Context("MakeImage"))       # while a plain node is cached
    finally:
        rt.close()


def test_config_from_env_and_file(tmp_path: Path) -> None:
    assert ProviderConfig.load({}) == ProviderConfig()
    path = tmp_path / "mesh.toml"
    path.write_text('mode = "sidecar"\nnode = "10.0.0.5:8288"\nseeds = ["a:1", "b:2"]\nmax_memory = "2GiB"\n'
                    'deny = ["KSampler"]\nlookup_timeout = 0.5\nzeroconf = true\n')
    config = ProviderConfig.load({"MESH_CONFIG": str(path), "MESH_NODE": "10.0.0.6:8288",
                                  "MESH_ALLOW": "VAEDecode, ImageScale", "MESH_SHUFFLE": "yes"})
    assert config.mode == "sidecar" and config.node == "10.0.0.6:8288"  # the environment wins over the file
    assert config.seeds == ("a:1", "b:2") and config.max_memory == 2 << 30 and config.deny == ("KSampler",)
    assert config.allow == ("VAEDecode", "ImageScale") and config.shuffle and config.zeroconf
    assert config.lookup_timeout == 0.5


@pytest.mark.parametrize("env, message", [
    ({"MESH_MODE": "cluster"}, "MESH_MODE must be embedded or sidecar"),
    ({"MESH_ZEROCONF": "maybe"}, "MESH_ZEROCONF must be a boolean"),
    ({"MESH_MAX_MEMORY": "lots"}, "MESH_MAX_MEMORY must be a size"),
    ({"MESH_LOOKUP_TIMEOUT": "soon"}, "MESH_LOOKUP_TIMEOUT must be a number"),
])
def test_bad_config_is_a_clear_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProviderConfig.load(env)


def test_unknown_setting_in_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "mesh.toml"
    path.write_text('mode = "embedded"\nlookup_timout = 1\n')
    with pytest.raises(ValueError, match="lookup_timout"):
        ProviderConfig.load({"MESH_CONFIG": str(path)})


# -- inside a ComfyUI (its API modules faked in a subprocess) ------------------------------------------------------


FAKE_COMFY = r'''
import sys, types, logging
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
nodes = types.ModuleType("nodes")
nodes.NODE_CLASS_MAPPINGS = {}
nodes.load_custom_node = lambda *a: None
sys.modules["nodes"] = nodes
if sys.argv[1] == "api":
    from pathlib import Path
    from tests.support.comfy_harness import CacheProvider, CacheValue, fake_folder_paths, serialize_cache_key
    sys.modules["folder_paths"] = fake_folder_paths(Path(sys.argv[2]))
    api = types.ModuleType("comfy_execution.cache_provider")
    registered = []
    api.CacheProvider, api.CacheValue = CacheProvider, CacheValue
    api._serialize_cache_key = serialize_cache_key
    api.register_cache_provider = registered.append
    api.unregister_cache_provider = registered.remove
    pkg = types.ModuleType("comfy_execution")
    pkg.cache_provider = api
    sys.modules["comfy_execution"], sys.modules["comfy_execution.cache_provider"] = pkg, api
import provider
if sys.argv[1] == "api":
    assert provider.RUNTIME is not None and registered == [provider.RUNTIME.provider]
    assert isinstance(registered[0], CacheProvider)
    assert provider.RUNTIME.identities.installed  # the key function is watched: values can be shared
    print("REGISTERED", provider.RUNTIME.provider.namespace)
else:
    assert provider.RUNTIME is None
    print("NOTHING")
'''


@pytest.mark.parametrize("api", ["api", "no-api"])
def test_loads_inside_comfyui(api: str, tmp_path: Path) -> None:
    env = {"MESH_SECRET": SECRET, "MESH_LISTEN": "127.0.0.1:0", "MESH_NAMESPACE": "fleet-a", "MESH_MIN_FREE_RAM": "0",
           "PATH": "/usr/bin:/bin", "MESH_IDENTITY_CACHE": str(tmp_path / "identities.json")}
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", FAKE_COMFY, api, str(tmp_path)], capture_output=True, text=True,
                          timeout=60,
                          cwd=root, env={**env, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    if api == "api":
        assert "REGISTERED cm1/comfyui-unknown/fleet-a" in done.stdout
        assert "comfy-mesh: embedded node" in done.stderr  # the one startup line
    else:
        assert "NOTHING" in done.stdout
        assert "has no CacheProvider API" in done.stderr


def test_the_embedded_node_listens_on_a_fixed_port_or_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    """Operators find a host's embedded node at 127.0.0.1:8289; a second ComfyUI there takes a free port."""
    from provider import runtime as provider_runtime
    from tests.support.comfy_harness import COMFY_VERSION, CacheValue, traits_lookup

    config = ProviderConfig.load({"MESH_SECRET": SECRET})
    assert config.listen == "127.0.0.1:8289"
    first = provider_runtime.start(config, cache_value=CacheValue, traits=traits_lookup(), comfy_version=COMFY_VERSION)
    try:
        with caplog.at_level(logging.WARNING):
            second = provider_runtime.start(config, cache_value=CacheValue, traits=traits_lookup(),
                                            comfy_version=COMFY_VERSION)
        try:
            addresses = {first.node.address, second.node.address}
            assert len(addresses) == 2  # the first took 8289 (unless something else on this host holds it)
            assert any("is taken" in r.getMessage() for r in caplog.records)
        finally:
            second.close()
    finally:
        first.close()
