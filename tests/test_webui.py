"""The provider's face in ComfyUI's web page, without a ComfyUI: the served-node events and the /comfy-mesh/ routes.

Two providers with embedded nodes share a real mesh on 127.0.0.1 and run prompts as ComfyUI's caching layer does
(tests/support/comfy_harness.py); the routes are served by a real aiohttp server, as ComfyUI's PromptServer
serves them. The browser test against a real ComfyUI is tests/test_comfyui_web.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

aiohttp = pytest.importorskip("aiohttp", reason="the routes run on aiohttp, ComfyUI's web server (a dev dependency)")
from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

import provider  # noqa: E402
from provider.events import EVENT, Served  # noqa: E402
from provider.routes import WebRoutes, parse_settings, served_sender, SettingsError  # noqa: E402
from tests.conftest import free_port, poll  # noqa: E402
from tests.support.comfy_harness import Engine, parser, standard_prompt, start_runtime  # noqa: E402
from tests.test_provider import _silent_node  # noqa: E402

SECRET = "webui-test-secret"
SLOW = 0.4  # SlowBlur's delay: the compute time B is told it saved


def runtime(*args: str) -> Any:
    # In one process both providers would install their identity hook into the same fake ComfyUI module: keys by
    # names (the identity is tested elsewhere; here it is what the page is told).
    return start_runtime(parser().parse_args(["--secret", SECRET, "--no-identity", "--lookup-timeout", "3", *args]))


class FakePromptServer:
    """What the provider uses of ComfyUI's PromptServer: send_sync(event, data, sid) and the prompt's client_id."""

    def __init__(self) -> None:
        self.client_id = "page-of-b"
        self.sent: list[tuple[str, dict[str, Any], str | None]] = []

    def send_sync(self, event: str, data: dict[str, Any], sid: str | None = None) -> None:
        self.sent.append((event, data, sid))


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Any, Any]]:
    """A and B, B seeded with A; A has run the standard prompt and its stores have landed."""
    a = runtime("--node-id", "comfy-a")
    b = None
    try:
        b = runtime("--node-id", "comfy-b", "--seeds", a.node.address)
        for rt in (a, b):
            poll(lambda rt=rt: sum(1 for m in rt.node.membership.members_pb() if m.state == 0) == 2,
                 "both members alive in each view", timeout=20)
        result = Engine(a.provider).run(standard_prompt(7, delay=SLOW), prompt_id="on-a")
        assert "blur" in result.executed and result.errors == []
        assert a.bridge.flush(30)
        yield a, b
    finally:
        if b is not None:
            b.close()
        a.close()


def test_each_node_served_from_the_mesh_is_one_event_naming_member_bytes_time_and_saved(pair: Any) -> None:
    a, b = pair
    server = FakePromptServer()
    b.provider.on_served = served_sender(server)
    try:
        result = Engine(b.provider).run(standard_prompt(7, delay=SLOW), prompt_id="on-b")
    finally:
        b.provider.on_served = None
    assert result.errors == [] and "blur" in result.provider_hits
    events = {data["node_id"]: (event, data, sid) for event, data, sid in server.sent}
    assert set(events) == set(result.provider_hits)  # one per served node, none for the nodes run here
    event, blur, sid = events["blur"]
    assert event == EVENT == "comfy-mesh.served" and sid == "page-of-b"
    assert blur["class_type"] == "SlowBlur" and blur["member"] == "comfy-a" and blur["prompt_id"] == "on-b"
    assert blur["bytes"] > 2 * 64 * 64 * 3 * 4 * 0.9  # the 2x64x64 RGB float image, as it came over
    assert 0 < blur["seconds"] < 3 and blur["ms"] == round(blur["seconds"] * 1000, 2)
    # What computing it cost A, measured on A (its last lookup to its store) and carried in the blob's meta.
    assert SLOW <= blur["saved_seconds"] < SLOW + 1.0 and blur["saved_ms"] == round(blur["saved_seconds"] * 1000, 1)
    assert events["image"][1]["saved_seconds"] < SLOW  # a cheap node saved little
    assert b.provider.totals["compute_seconds_saved"] >= SLOW


def test_a_failing_listener_never_fails_the_lookup(pair: Any) -> None:
    a, b = pair

    def broken(served: Served) -> None:
        raise RuntimeError("the page is gone")

    b.provider.on_served = broken
    try:
        result = Engine(b.provider).run(standard_prompt(7, delay=SLOW), prompt_id="on-b-again")
    finally:
        b.provider.on_served = None
    assert result.errors == [] and "blur" in result.provider_hits and "blur" not in result.executed


async def _client(routes_of: WebRoutes) -> TestClient:
    routes = web.RouteTableDef()
    routes_of.add_to(routes)
    app = web.Application()
    app.add_routes(routes)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


def test_status_route_lists_both_members_budget_hit_ratio_and_saved_time(pair: Any) -> None:
    a, b = pair
    Engine(b.provider).run(standard_prompt(7, delay=SLOW), prompt_id="status")  # hits, if not run before

    async def go() -> dict[str, Any]:
        client = await _client(WebRoutes(lambda: b))
        try:
            r = await client.get("/comfy-mesh/status")
            assert r.status == 200
            return await r.json()
        finally:
            await client.close()

    data = asyncio.run(go())
    assert data["running"] is True and data["mesh_error"] is None and data["node_id"] == "comfy-b"
    members = {m["node_id"]: m for m in data["members"]}
    assert set(members) == {"comfy-a", "comfy-b"} and members["comfy-b"]["self"] and not members["comfy-a"]["self"]
    assert {m["state"] for m in members.values()} == {"ALIVE"} and data["states"]["ALIVE"] == 2
    budget = data["budget"]  # the node's budget, split between the keys it owns and its near cache
    assert budget["max_memory"] + budget["near_max_memory"] == b.config.max_memory and budget["entries"] > 0
    p = data["provider"]
    assert p["hits"] >= 8 and 0 < p["hit_ratio"] <= 1 and p["saved_seconds"] >= SLOW and p["bytes_served"] > 0
    # each node counts once: a node computed here is looked up twice per prompt, and that is one miss
    assert p["hit_ratio"] == round(p["hits"] / (p["hits"] + p["misses"]), 4)
    assert data["settings"]["enabled"] is True and data["warnings"] == []


def test_status_with_the_mesh_down_answers_within_its_deadline_and_says_why() -> None:
    rt = runtime("--mode", "sidecar", "--node", f"127.0.0.1:{free_port()}")
    try:
        async def go() -> tuple[int, dict[str, Any], float]:
            client = await _client(WebRoutes(lambda: rt, timeout=1.0))
            try:
                started = time.monotonic()
                r = await client.get("/comfy-mesh/status")
                return r.status, await r.json(), time.monotonic() - started
            finally:
                await client.close()

        status, data, took = asyncio.run(go())
        assert status == 200 and took < 3.0
        assert data["running"] is True and data["mesh_error"] and data["members"] == []
        assert any("does not answer" in w for w in data["warnings"]) and data["provider"]["lookups"] == 0
    finally:
        rt.close()


def test_status_when_comfy_mesh_did_not_start_names_the_reason() -> None:
    async def go() -> tuple[dict[str, Any], int]:
        client = await _client(WebRoutes(lambda: None, lambda: "not started: MESH_MODE must be embedded"))
        try:
            status = await (await client.get("/comfy-mesh/status")).json()
            settings = await client.post("/comfy-mesh/settings", json={"enabled": False})
            return status, settings.status
        finally:
            await client.close()

    status, code = asyncio.run(go())
    assert status["running"] is False and "MESH_MODE" in status["reason"] and code == 503


def test_a_silent_mesh_never_blocks_comfyuis_event_loop() -> None:
    """The status waits on a node that never answers; meanwhile the loop that serves ComfyUI's pages must run on."""
    with _silent_node("tcp") as address:
        rt = runtime("--mode", "sidecar", "--node", address)
        try:
            async def go() -> tuple[float, int, float]:
                client = await _client(WebRoutes(lambda: rt, timeout=1.0))
                try:
                    lag = 0.0

                    async def ticker() -> None:
                        nonlocal lag
                        while True:
                            t = time.monotonic()
                            await asyncio.sleep(0.01)
                            lag = max(lag, time.monotonic() - t - 0.01)

                    tick = asyncio.create_task(ticker())
                    started = time.monotonic()
                    r = await client.get("/comfy-mesh/status")
                    took = time.monotonic() - started
                    await asyncio.sleep(0.05)  # the ticker's wake-up that a stalled loop delayed is counted too
                    tick.cancel()
                    return lag, r.status, took
                finally:
                    await client.close()

            lag, status, took = asyncio.run(go())
            assert status in (200, 504) and 0.9 <= took < 3.5  # it waited for the deadline, and no longer
            assert lag < 0.25, f"the event loop stalled {lag:.2f} s"
        finally:
            rt.close()


def test_settings_route_turns_the_provider_off_and_adds_never_cached_classes(pair: Any) -> None:
    a, b = pair

    class Ctx:
        def __init__(self, class_type: str) -> None:
            self.node_id, self.class_type, self.cache_key_hash = "1", class_type, "d"

    async def go() -> list[tuple[int, dict[str, Any]]]:
        client = await _client(WebRoutes(lambda: b))
        out = []
        try:
            for body in ({"never": "SlowBlur, MakeLatent"}, {"enabled": False}, {"enabled": "no"}, {"colour": 1},
                         {"enabled": True, "never": []}):
                r = await client.post("/comfy-mesh/settings", json=body)
                out.append((r.status, await r.json()))
                if body == {"never": "SlowBlur, MakeLatent"}:
                    assert not b.provider.should_cache(Ctx("SlowBlur")) and b.provider.should_cache(Ctx("MakeImage"))
                if body == {"enabled": False}:
                    assert not b.provider.should_cache(Ctx("MakeImage"))
            r = await client.post("/comfy-mesh/settings", data=b"not json", headers={"Content-Type": "application/json"})
            out.append((r.status, await r.json()))
            # Another site's page: a form/no-cors text/plain POST needs no preflight; an Origin of another host
            for kwargs in ({"data": b'{"enabled": false}', "headers": {"Content-Type": "text/plain"}},
                           {"json": {"enabled": False}, "headers": {"Origin": "http://evil.example"}}):
                r = await client.post("/comfy-mesh/settings", **kwargs)
                cross.append((r.status, await r.json()))
                assert b.provider.should_cache(Ctx("MakeImage"))  # still on
            r = await client.post("/comfy-mesh/settings", json={"never": []},
                                  headers={"Origin": f"http://{client.server.host}:{client.server.port}"})
            cross.append((r.status, await r.json()))
            out.append(((r := await client.get("/comfy-mesh/settings")).status, await r.json()))
        finally:
            b.provider.policy.configure(enabled=True, never=[])
            await client.close()
        return out

    cross: list[tuple[int, dict[str, Any]]] = []
    never, off, bad_bool, unknown, back, not_json, current = asyncio.run(go())
    assert [status for status, _ in cross] == [403, 403, 200], cross  # the page's own origin is fine
    assert never == (200, {"running": True, "enabled": True, "never": ["MakeLatent", "SlowBlur"], "deny": [],
                           "allow": []})
    assert off[0] == 200 and off[1]["enabled"] is False
    assert bad_bool[0] == 400 and "true or false" in bad_bool[1]["error"]
    assert unknown[0] == 400 and "colour" in unknown[1]["error"]
    assert back[0] == 200 and back[1]["enabled"] is True and back[1]["never"] == []
    assert not_json[0] == 400 and current == (200, {"running": True, "enabled": True, "never": [], "deny": [],
                                                    "allow": []})
    assert b.provider.should_cache(Ctx("SlowBlur"))


def test_settings_bodies_are_checked_not_guessed() -> None:
    assert parse_settings({"never": ["A", " B ", ""]}) == {"never": ["A", "B"]}
    assert parse_settings({}) == {}
    for bad in ([], {"never": 3}, {"never": [1]}, {"never": ["x" * 201]}, {"enabled": 1}):
        with pytest.raises(SettingsError):
            parse_settings(bad)


def test_the_web_directory_holds_the_extension() -> None:
    web_dir = Path(provider.__file__).parent / provider.WEB_DIRECTORY
    script = (web_dir / "comfy_mesh.js").read_text()
    for api in ("registerExtension", "registerSidebarTab", "comfy-mesh.served", "/comfy-mesh/status",
                "/comfy-mesh/settings", "LGraphBadge"):
        assert api in script
    # feature-detected: a frontend without the extension manager or badges loses that part only
    assert 'typeof manager.registerSidebarTab === "function"' in script and "drawFallback" in script


def test_routes_and_events_are_added_to_comfyuis_server_where_it_has_them(pair: Any, monkeypatch: Any) -> None:
    import sys
    import types

    from provider.comfy import add_web_routes

    a, b = pair
    monkeypatch.setitem(sys.modules, "server", types.ModuleType("server"))  # a ComfyUI without PromptServer
    assert add_web_routes(lambda: b, lambda: "") is False and b.provider.on_served is None

    prompt_server = FakePromptServer()
    prompt_server.routes = web.RouteTableDef()  # type: ignore[attr-defined]
    module = types.ModuleType("server")
    module.PromptServer = type("PromptServer", (), {"instance": prompt_server})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "server", module)
    try:
        assert add_web_routes(lambda: b, lambda: "") is True
        paths = {(r.method, r.path) for r in prompt_server.routes}  # type: ignore[attr-defined]
        assert paths == {("GET", "/comfy-mesh/status"), ("GET", "/comfy-mesh/settings"),
                         ("POST", "/comfy-mesh/settings")}
        b.provider.on_served(Served("9", "X", "comfy-a", 1, 0.001, None))  # type: ignore[misc]
        assert prompt_server.sent[0][0] == EVENT and prompt_server.sent[0][2] == "page-of-b"
    finally:
        b.provider.on_served = None


def test_status_in_sidecar_mode_is_the_sidecars_view() -> None:
    from tests.support.localmesh import LocalMesh

    with LocalMesh(secret=SECRET.encode()) as mesh:
        mesh.start(2)
        mesh.wait_members(2)
        rt = runtime("--mode", "sidecar", "--node", mesh.nodes[0].address)
        try:
            data = status_of(rt)
        finally:
            rt.close()
    assert data["mode"] == "sidecar" and data["mesh_error"] is None and data["node_id"] == "node0"
    assert {m["node_id"]: m["state"] for m in data["members"]} == {"node0": "ALIVE", "node1": "ALIVE"}


def status_of(rt: Any) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        client = await _client(WebRoutes(lambda: rt))
        try:
            return await (await client.get("/comfy-mesh/status")).json()
        finally:
            await client.close()

    return asyncio.run(go())


def test_a_node_served_after_a_dedupe_wait_is_marked_and_counted_once_as_served() -> None:
    """Its prompt-start lookup missed, its pre-execution lookup was served another instance's value after a
    wait: one served event, and the panel counts one node, served (not a miss and a hit)."""
    import types

    from provider.bridge import Found
    from provider.cache_provider import MeshCacheProvider
    from provider.dedupe import DedupeCounters
    from provider.policy import Policy
    from provider.status import provider_part

    class Bridge:
        counters = types.SimpleNamespace(stores=0, stores_dropped=0, store_errors=0, breaker_trips=0)

        def submit(self, batch: list[Any]) -> None:
            for _, future in batch:
                future.set_result(None)  # a miss at the prompt-start lookup

    class Dedupe:
        counters = DedupeCounters()

        async def before_compute(self, key: str, class_type: str, prompt: str, fetch: Any) -> Found:
            return Found({"outputs": [[1]], "ui": None}, 10, ("gpu2",), 5.0)  # computed meanwhile by gpu2

        def prompt_end(self, prompt: str) -> None:
            pass

    p = MeshCacheProvider(Bridge(), Policy(lambda c: None), namespace="ns",  # type: ignore[arg-type]
                          cache_value=lambda outputs, ui: ("VALUE", outputs), lookup_timeout=1.0)
    p.dedupe = Dedupe()  # type: ignore[assignment]
    served: list[Any] = []
    p.on_served = served.append
    ctx = types.SimpleNamespace(cache_key_hash="abc", class_type="KSampler", node_id="3")

    async def prompt() -> list[Any]:
        p.on_prompt_start("P1")
        answers = [await p.on_lookup(ctx), await p.on_lookup(ctx)]
        p.on_prompt_end("P1")
        return answers

    assert asyncio.run(prompt()) == [None, ("VALUE", [[1]])]
    assert [(e.node_id, e.member, e.saved_seconds) for e in served] == [("3", "gpu2", 5.0)]
    part = provider_part(types.SimpleNamespace(provider=p))  # type: ignore[arg-type]
    assert (part["hits"], part["misses"], part["hit_ratio"]) == (1, 0, 1.0)
